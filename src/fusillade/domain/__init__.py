"""Pure domain: ids, records, the request state machine, retry policy and JSONL formats. No I/O."""
