"""The run console: a SQLite index fed by Kafka (``index``, ``feed``), ``legato runs`` and a web page (``web``).

Every view here is rebuilt from the log; every action is a record on the topics the CLI writes.
"""
