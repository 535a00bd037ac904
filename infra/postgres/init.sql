-- Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d), as
-- POSTGRES_USER in the POSTGRES_DB database (prefect): the second database, for MLflow.
CREATE DATABASE mlflow;
