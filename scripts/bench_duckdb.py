#!/usr/bin/env python3
"""The DuckDB side of `make bench-batch`: run one SQL query over a list of
Parquet files, once, and print its time and result totals as JSON.

The query is the batch layer's own `product_demand_hourly` SQL over a
relation `lake_events`; here `lake_events` is a view over exactly the files of the
Delta snapshot DataFusion reads. Only the query is timed (Python's start, the connection and the view
definition are not).
"""
import argparse
import json
import sys
import time

import duckdb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", required=True, help="file with one Parquet path per line")
    ap.add_argument("--sql", required=True, help="file with the query over `lake_events`")
    args = ap.parse_args()
    with open(args.files) as f:
        files = [line.strip() for line in f if line.strip()]
    with open(args.sql) as f:
        sql = f.read()
    if not files:
        print("error: no Parquet files listed in " + args.files, file=sys.stderr)
        return 1

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE VIEW lake_events AS SELECT * FROM read_parquet([{listed}])")
    # The result is materialised in memory, as DataFusion's collect() does;
    # the totals are read from it afterwards, untimed.
    started = time.perf_counter()
    con.execute("CREATE TEMP TABLE result AS " + sql)
    seconds = time.perf_counter() - started

    columns = [c[0] for c in con.execute("DESCRIBE result").fetchall()]
    measures = columns[2:]  # hour, product_id, then the measures
    totals = con.execute(
        "SELECT count(*), " + ", ".join(f"COALESCE(sum({m}), 0)::BIGINT" for m in measures) + " FROM result"
    ).fetchone()
    rows, sums = totals[0], [int(x) for x in totals[1:]]
    print(json.dumps({"seconds": seconds, "rows": rows, "sums": sums, "duckdb": duckdb.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
