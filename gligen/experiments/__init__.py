"""The experiment scripts' logic (`experiments/<name>.py` are shims that call `gligen.experiments.entry.main(name)`):
one typed dataclass config per experiment (`config.py`), read by jsonargparse with `--config` (repeatable),
`--print_config` and flag / dotted overrides, the same look as `python -m gligen fit`."""
