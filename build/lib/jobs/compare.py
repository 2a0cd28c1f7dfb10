"""Compare evaluated runs in one MLflow experiment.

    python -m jobs.compare --experiment NAME [--filter "tags.flowray.method = 'fm_ot'"] [--out outputs/compare]
    python -m jobs.compare --models NAME    (the registry's versions of NAME, with their latest evaluation)

Prints the paper-style table (method / path / coupling × bits/dim × FD × NFE × steps; mean ± std over runs) as
markdown, saves it as CSV, plots FD against sampling NFE, and logs both to a "compare" run in the experiment.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.cli import add_common, run_job


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=None, help="the experiment whose evaluated runs to compare")
    p.add_argument(
        "--models",
        default=None,
        metavar="NAME",
        help="list the versions of this registered model (description, latest evaluation) instead",
    )
    p.add_argument("--filter", default="", help="an extra MLflow search_runs filter, ANDed with kind = evaluate")
    p.add_argument("--out", default="outputs/compare")
    add_common(p, overrides=False)
    a = p.parse_args(argv)
    return run_job("compare", a, lambda: _compare(a))


def _compare(a) -> dict:
    from pipelines.compare import COLUMNS, collect, markdown, model_versions, plot_nfe_vs_fd, table, versions_markdown
    from pipelines.core.errors import ConfigError
    from pipelines.core.figures import write_csv
    from pipelines.core.tracking import tracking_uri

    uri = a.tracking_uri or tracking_uri()
    if a.models:
        versions = model_versions(uri, a.models)
        if not versions:
            raise ConfigError(f"--models: no registered model {a.models!r} with versions at {uri}")
        print(versions_markdown(versions))
        result = {"model": a.models, "versions": versions}
        print(json.dumps(result))
        return result
    if not a.experiment:
        raise ConfigError("give --experiment NAME (runs to compare) or --models NAME (registry versions to list)")
    records = collect(uri, a.experiment, a.filter)
    if not records:
        raise ConfigError(f"no evaluation runs in experiment {a.experiment!r} at {uri}")
    rows = table(records)
    md = markdown(rows)
    print(md)
    out = Path(a.out)
    csv_path = write_csv(rows, out / f"{a.experiment}.csv", COLUMNS)
    (out / f"{a.experiment}.md").write_text(md + "\n")
    plot = plot_nfe_vs_fd(rows, out / f"{a.experiment}-nfe-vs-fd.png")
    from pipelines.core.run_logger import SafeLogger
    from pipelines.core.tracking import start_child_run

    run_id = None
    if not a.no_mlflow:
        run_id = start_child_run(uri, None, "compare", "compare", experiment=a.experiment)
        log = SafeLogger(uri, run_id)
        for path in (csv_path, out / f"{a.experiment}.md", plot):
            if path:
                log.artifact(path)
        log.finish()
    result = {
        "experiment": a.experiment,
        "rows": len(rows),
        "csv": str(csv_path),
        "plot": str(plot) if plot else None,
        "compare_run_id": run_id,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
