"""The delivery stage: reconciles the ledger with Graph message trace, per recipient."""
