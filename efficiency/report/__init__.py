"""Reports: schema, atomic JSON I/O, environment capture, rendering."""
