"""Data: text -> token files (prepare), batches from them (memmap), instruction data, stories."""
