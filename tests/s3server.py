"""An S3-compatible server on loopback for the object storage tests: moto's server mode in a thread of the
test process, on a free port, with the Hadoop s3a settings that reach it."""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager

import boto3
from moto.server import ThreadedMotoServer

HADOOP_PREFIX = "spark.hadoop."
ACCESS_KEY, SECRET_KEY, REGION = "lakelens-test-key", "lakelens-test-secret", "us-east-1"


class MotoS3:
    """`MotoS3()` starts the server; `.bucket()` makes a bucket with a name unique to this run (Hadoop caches
    one S3A file system per bucket, so a name is never reused with another server's port); `.extra` are
    the `spark.extra` settings of a lakelens config that reaches it; `.stop()` ends it."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                                   aws_secret_access_key=SECRET_KEY, region_name=REGION)
        # the same keys a user puts in conf/s3.example.yaml
        self.extra = {
            "spark.hadoop.fs.s3a.endpoint": self.endpoint,
            "spark.hadoop.fs.s3a.endpoint.region": REGION,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
            "spark.hadoop.fs.s3a.aws.credentials.provider":
                "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            "spark.hadoop.fs.s3a.access.key": ACCESS_KEY,
            "spark.hadoop.fs.s3a.secret.key": SECRET_KEY,
        }

    def bucket(self) -> str:
        name = f"lakelens-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3a://{bucket}/{key}"

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    @contextmanager
    def hadoop_settings(self, spark):
        """The s3a settings on a running session's Hadoop configuration (the shared test session was
        started from conf/local.yaml; a session built from a config with `.extra` gets them at start-up),
        restored afterwards."""
        keys = {k[len(HADOOP_PREFIX):]: v for k, v in self.extra.items()}
        from lakelens.spark import is_connect

        if is_connect(spark):  # session settings reach the Hadoop configuration of the session's reads
            from lakelens.spark import session_settings

            with session_settings(spark, keys):
                yield
            return
        hconf = spark.sparkContext._jsc.hadoopConfiguration()
        before = {k: hconf.get(k) for k in keys}
        for k, v in keys.items():
            hconf.set(k, v)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    hconf.unset(k)
                else:
                    hconf.set(k, v)

    def stop(self) -> None:
        self.server.stop()
