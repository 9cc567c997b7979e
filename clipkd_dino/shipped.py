"""Where the files the package ships beside its code are: the checkout's `configs/`, `concepts/` and `assets/`,
linked into the package as `_shipped/` (a wheel carries them as files), so one path works from a checkout and from an
installed wheel."""

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "_shipped"
CONFIGS = SHIPPED / "configs"
CONCEPTS = SHIPPED / "concepts"
ASSETS = SHIPPED / "assets"
