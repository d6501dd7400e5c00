"""recloop's online half as an Apache Flink job: :mod:`.job` (the PyFlink file, runnable on
its own and by ``flink run -py``) and :mod:`.runner` (``recloop flink``, which launches it on
a local mini-cluster in an interpreter that has ``apache-flink``)."""
