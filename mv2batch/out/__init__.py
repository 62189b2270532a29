"""OUT on disk or a store: its layout (markers, parts, lock), files written whole, the Parquet schema and
the background part writer."""
