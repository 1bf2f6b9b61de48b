"""What a written file was made with: the versions of the packages that shape its numbers.

A leaf: ``data.prepare`` (the prepared file's ``versions`` attribute and side file) and ``runs``
(a run's ``config.json``) both record :func:`package_versions`, so the two lists cannot drift.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# sicot itself; torch/torchvision (training, the image transforms); numpy and h5py (the prepared
# file); gensim (word2vec), jieba (tokenisation) and pillow (image decoding) at prepare time.
PACKAGES = ("sicot", "torch", "torchvision", "numpy", "h5py", "gensim", "jieba", "pillow")


def package_versions() -> dict[str, str]:
    """The installed version of each of :data:`PACKAGES` ("unknown" when it is not installed).

    Read from the installed distributions' metadata: nothing is imported.
    """
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
