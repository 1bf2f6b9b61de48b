"""Importers: datasets in their own released layouts -> the manifest ``sicot prepare`` reads.

- :mod:`~sicot_cli.data.importers.emoji`: the offline emoji image+title benchmark (two npm packages);
- :mod:`~sicot_cli.data.importers.mdi`: Material Design Icons, the second offline benchmark (one npm package);
- :mod:`~sicot_cli.data.importers.icons`: the offline pretraining corpus (five npm icon sets), disjoint
  from the benchmarks' images;
- :mod:`~sicot_cli.data.importers.imaterialist`: iMaterialist Product 2019 (FGVC6) plus a titles file;
- :mod:`~sicot_cli.data.importers.webvision`: WebVision 2.0 ("selected 1k": seeded random classes).

:mod:`~sicot_cli.data.importers.npm` fetches and unpacks pinned npm packages;
:mod:`~sicot_cli.data.importers.svg` rasterises SVG icons into PNGs. Each importer writes a CSV
manifest (``image,title,label[,split],id``) and returns an
:class:`~sicot_cli.data.importers.common.ImportSummary`. Importers read only what they need and never
decode raster images (``prepare`` does, and counts the unreadable ones).
"""
