"""Datasets: the SMS Spam Collection (the book's), any user classification file, instruction data."""
