"""nextscale: VAR-style next-scale image generators trained at scale (Ray Data pretokenization, Ray Train on
codes, distributed FID), and a small Python API for notebooks:

    import nextscale
    tokenizer = nextscale.load_tokenizer("hf://FoundationVision/var/vae_ch160v4096z32.pth")
    prior = nextscale.load_prior("hf://FoundationVision/var/var_d16.pth")
    images = nextscale.sample(prior, tokenizer, classes=[207, 360, 387])

The API (``load_tokenizer``, ``load_prior``, ``sample``, ``encode``, ``decode``, ``save_pretrained``,
``from_pretrained``; see ``docs/api.md``) is imported on first use, so ``import nextscale`` stays light.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nextscale")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_API = ("load_tokenizer", "load_prior", "sample", "encode", "decode", "save_pretrained", "from_pretrained")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module("nextscale.api"), name)
    raise AttributeError(f"module 'nextscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
