"""Importers: datasets in their own released layouts -> the manifest ``sicot prepare`` reads.

- :mod:`~sicot_cli.data.importers.emoji`: the offline emoji image+title benchmark (two npm packages);
- :mod:`~sicot_cli.data.importers.imaterialist`: iMaterialist Product 2019 (FGVC6) plus a titles file;
- :mod:`~sicot_cli.data.importers.webvision`: WebVision 2.0 ("selected 1k": seeded random classes).

Each writes one CSV manifest (``image,title,label[,split],id``) and returns an
:class:`~sicot_cli.data.importers.common.ImportSummary`. Importers read only what they need and never
decode images (``prepare`` does, and counts the unreadable ones).
"""
