"""--where: a SQL boolean over a run's predictions, checked before anything is written, then judged part by part
in DuckDB, with --unique's duplicates as a table beside it.

The predicate is the user's SQL, so it is parsed first (DuckDB's own parser, as JSON) and must be one
expression: `1=1); COPY ... TO '/somewhere'; SELECT (1` would otherwise run as three statements. Its column
references say whether it asks for error rows; without `status` or `error` in it, `status = 'ok'` is added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mv2batch.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

ROW = "mv2batch_row"  # the row's position in its part, added before judging: the answer comes back in that order
DUPLICATES = "mv2batch_duplicates"
ASKS_FOR_ERRORS = frozenset({"status", "error"})
ERROR, WHERE, DUPLICATE = "error", "where", "duplicate"  # the reasons a row is dropped, in the order tested


@dataclass(frozen=True)
class Predicate:
    """A checked --where: its text, the run's columns it reads, and whether `status = 'ok'` is added to it."""

    where: str | None
    columns: frozenset[str]
    only_ok: bool

    def describe(self) -> str:
        """What is kept, as SQL (filter.json)."""
        if self.where is None:
            return "status = 'ok'"
        return f"status = 'ok' AND ({self.where})" if self.only_ok else self.where


def compile_predicate(where: str | None, schema: pa.Schema) -> Predicate:
    """The checked predicate; ConfigError in one line (naming the columns there are) when it is not one boolean
    expression over the predictions' columns."""
    if where is None or not where.strip():
        return Predicate(None, frozenset({"status"}), True)
    referenced = _column_references(_one_expression(where, schema.names))
    used = {name for name in referenced if name in set(schema.names)}
    _check_boolean(where, schema)
    only_ok = not (referenced & ASKS_FOR_ERRORS)
    return Predicate(where.strip(), frozenset(used | ({"status"} if only_ok else set())), only_ok)


def _columns_line(names: list[str]) -> str:
    return f"the predictions' columns are: {', '.join(names)}"


def _one_expression(where: str, names: list[str]) -> dict:
    """DuckDB's parse tree of `SELECT (where)`; refused unless it is a single expression without subqueries."""
    import duckdb

    text = duckdb.connect().execute("SELECT json_serialize_sql(?)", [f"SELECT ({where})"]).fetchone()[0]
    tree = json.loads(text)
    if tree.get("error"):
        message = str(tree.get("error_message", "")).splitlines()[0]
        raise ConfigError(f"--where is not an SQL expression ({message}); {_columns_line(names)}")
    statements = tree.get("statements", [])
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    single = (node.get("type") == "SELECT_NODE" and len(node.get("select_list", [])) == 1
              and node.get("from_table", {}).get("type") == "EMPTY" and node.get("where_clause") is None
              and not node.get("modifiers") and not node.get("cte_map", {}).get("map"))
    if not single or _has_subquery(node.get("select_list", [])):
        raise ConfigError(f"--where must be one boolean expression over a row, without subqueries or ';' "
                          f"(e.g. \"label % 2 = 0\"); {_columns_line(names)}")
    return node["select_list"][0]


def _has_subquery(tree: Any) -> bool:  # tree: a JSON value of DuckDB's parse tree
    if isinstance(tree, dict):
        return tree.get("class") == "SUBQUERY" or any(_has_subquery(value) for value in tree.values())
    return isinstance(tree, list) and any(_has_subquery(value) for value in tree)


def _column_references(tree: Any) -> set[str]:  # tree: as _has_subquery's
    """Every name a column reference of the tree uses (a struct field's too, and a lambda's parameters: only
    those naming a column are read)."""
    if isinstance(tree, dict):
        found = {str(name) for name in tree.get("column_names", [])} if tree.get("class") == "COLUMN_REF" else set()
        return found.union(*(_column_references(value) for value in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_column_references(value) for value in tree))
    return set()


def _check_boolean(where: str, schema: pa.Schema) -> None:
    """The predicate bound against the run's columns (no rows read): a missing column or a non-boolean value is
    refused here, before anything is written."""
    import duckdb

    connection = duckdb.connect()
    connection.register("part", schema.empty_table())
    try:
        described = connection.execute(f"DESCRIBE SELECT ({where}) AS passes FROM part").fetchall()
    except duckdb.Error as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--where cannot be evaluated ({message}); {_columns_line(schema.names)}") from None
    finally:
        connection.close()
    kind = described[0][1]
    if kind != "BOOLEAN":
        raise ConfigError(f"--where must be true or false for each row, but it gives {kind} (e.g. \"label % 2 = 0\");"
                          f" {_columns_line(schema.names)}")


class Judge:
    """The predicate, and --unique's duplicates, applied to one part's columns at a time: for each row the reason
    it is dropped (error, where, duplicate) or null where it is kept, in the part's row order."""

    def __init__(self, predicate: Predicate, duplicates: pa.Array | None = None):
        import duckdb
        import pyarrow as pa

        self.connection = duckdb.connect()
        self.unique = duplicates is not None
        if self.unique:  # a DuckDB table: it may spill to disk, and each part is joined with it once
            self.connection.register("mv2batch_found", pa.table({"id": duplicates}))
            self.connection.execute(f"CREATE TEMP TABLE {DUPLICATES} AS SELECT DISTINCT id FROM mv2batch_found")
            self.connection.unregister("mv2batch_found")
        self.query = _judging_query(predicate, self.unique)
        self.columns = set(predicate.columns) | {"id", "status"}  # what a part is read for

    def reasons(self, part: pa.Table) -> pa.Array:
        """part: a pyarrow Table of the columns the predicate reads, `id`, `status` and ROW."""
        self.connection.register("part", part)
        try:
            relation = self.connection.sql(self.query)
            table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        finally:
            self.connection.unregister("part")
        return table.column("reason").combine_chunks()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *failure: Any) -> None:
        self.connection.close()


def _judging_query(predicate: Predicate, unique: bool) -> str:
    ok = "coalesce(status = 'ok', false)" if predicate.only_ok else "true"
    passes = f"coalesce(({predicate.where}), false)" if predicate.where is not None else "true"
    judged = f"SELECT {ROW} AS mv2batch_position, id AS mv2batch_id, {ok} AS mv2batch_ok, {passes} AS " \
             "mv2batch_passes FROM part"
    duplicate = "d.id IS NOT NULL" if unique else "false"
    joined = f"LEFT JOIN {DUPLICATES} d ON judged.mv2batch_id = d.id" if unique else ""
    return (f"WITH judged AS ({judged}) SELECT CASE WHEN NOT mv2batch_ok THEN '{ERROR}' "
            f"WHEN NOT mv2batch_passes THEN '{WHERE}' WHEN {duplicate} THEN '{DUPLICATE}' END AS reason "
            f"FROM judged {joined} ORDER BY mv2batch_position")
