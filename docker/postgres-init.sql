-- One PostgreSQL for the stack: Prefect's database is created by the image's env,
-- MLflow's here.
CREATE DATABASE mlflow;
