"""Reading a user's parts: finding them, naming them, reading them in record batches."""
