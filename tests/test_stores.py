"""What of a store URL may be shown, and what a storage failure says."""

import pytest
from sqlalchemy.exc import OperationalError

from sweep.stores import mask_url, storage_error


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://sweep:s3cret@db:5432/optuna", "postgresql://sweep:***@db:5432/optuna"),
        ("postgresql+psycopg2://u:p%40ss@db/optuna", "postgresql+psycopg2://u:***@db/optuna"),
        ("postgresql://sweep@db/optuna?password=s3cret&sslmode=require", "password=***"),
        ("mysql://root:s3cret@db/optuna", "mysql://root:***@db/optuna"),
        ("https://alice:s3cret@mlflow.example.com:5000", "https://alice:***@mlflow.example.com:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////home/me/mlruns/optuna.db", "sqlite:////home/me/mlruns/optuna.db"),
        ("postgresql://sweep@db/optuna", "postgresql://sweep@db/optuna"),
    ],
)
def test_a_password_in_a_url_is_masked_and_nothing_else_changes(url, shown):
    masked = mask_url(url)
    assert shown in masked
    assert "s3cret" not in masked and "p%40ss" not in masked


@pytest.mark.parametrize(
    "driver_message, hint",
    [
        ('connection failed: FATAL:  password authentication failed for user "sweep"', "PGPASSWORD"),
        ('connection failed: FATAL:  database "nope" does not exist', "createdb"),
        ("connection failed: Connection refused\n\tIs the server running on that host?", "host and port"),
        ("No module named 'psycopg'", "pip install -e '.[postgres]'"),
        ("something new", "--storage (or $OPTUNA_STORAGE)"),
    ],
)
def test_a_storage_error_is_one_line_with_the_masked_url_the_reason_and_the_fix(driver_message, hint):
    url = "postgresql://sweep:s3cret@db:5432/optuna"
    error = storage_error(url, OperationalError("connect", {}, Exception(driver_message)))
    message = str(error)
    assert "\n" not in message
    assert message.startswith("cannot open the Optuna storage postgresql://sweep:***@db:5432/optuna: ")
    assert driver_message.splitlines()[0].removeprefix("connection failed: ").split()[0] in message
    assert hint in message and "s3cret" not in message
