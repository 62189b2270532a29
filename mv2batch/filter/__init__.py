"""`mv2batch filter OUT -o DEST`: a finished run's kept items (a SQL predicate over its predictions, one per
duplicate group) written in the input's own format, byte for byte, with their predictions beside them."""
