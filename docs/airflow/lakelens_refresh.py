"""Airflow DAG: refresh the lakelens table and index every 30 minutes (docs/scheduling.md).

It runs scripts/refresh.sh, the same command as the cron line, which the project's tests run. The
script exits 0 when done or nothing changed; 2 when another refresh still runs (max_active_runs=1 makes
that rare) or the config is bad. Set LAKELENS_HOME to the checkout (with its .venv from `make setup`)."""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG(
    dag_id="lakelens_refresh",
    schedule=timedelta(minutes=30),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5)},
    params={"images": "s3a://photos/", "table": "s3a://lake/lakelens/embeddings", "index": "/srv/lakelens/index"},
) as dag:
    BashOperator(
        task_id="refresh",
        bash_command="$LAKELENS_HOME/scripts/refresh.sh {{ params.images }} {{ params.table }} {{ params.index }}",
        env={"LAKELENS_CONF": "{{ var.value.get('lakelens_conf', '') }}"},
        append_env=True,
    )
