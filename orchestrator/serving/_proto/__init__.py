"""Generated protocol modules of the serving front (see generate.py); the .proto files are their source."""
