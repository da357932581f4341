"""The cluster file as a pod source: parser (``spec``), deterministic netns names and IPs
(``layout``), pods and mesh state (``mesh``), and the polling source (``source``)."""
