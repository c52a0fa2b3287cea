CREATE DATABASE mlflow OWNER aeforge;
