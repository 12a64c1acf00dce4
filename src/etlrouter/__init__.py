"""ETL Router: a Kubernetes-native data-routing platform for ETL."""

__version__ = "0.1.0"
