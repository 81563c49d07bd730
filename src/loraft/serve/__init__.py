"""`loraft serve`: an HTTP API and a web page over one base model with several adapters."""
