"""The decoder objective's transform: mixed-modal documents, packing, the sequence batch."""
