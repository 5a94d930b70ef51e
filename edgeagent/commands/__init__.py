"""Fleet commands and local operations: the router that parses, de-duplicates and answers
requests on `cmd/<name>` (`router`), and what each command does, shared by MQTT and the local
control socket (`operations`)."""
