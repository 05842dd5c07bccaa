"""Hardware descriptions: the YAML format, its loader and the typed `Hardware` value."""

from simulator.hardware.loader import load_hardware, schema_json, shipped
from simulator.hardware.schema import Delay, Hardware, Unit

__all__ = ["Delay", "Hardware", "Unit", "load_hardware", "schema_json", "shipped"]
