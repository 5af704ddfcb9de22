"""LightningModules per task family. Import the one you need (e.g. ``rocoft_pl.modules.classification``);
nothing is imported here so that ``import rocoft_pl`` stays fast."""
