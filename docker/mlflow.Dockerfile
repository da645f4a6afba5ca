# MLflow tracking server with PostgreSQL and S3 (MinIO) support.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1
RUN python -m pip install "mlflow>=3.1,<3.18" psycopg2-binary boto3
EXPOSE 5000
