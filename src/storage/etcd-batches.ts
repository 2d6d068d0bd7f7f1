/** A key and value to put in etcd. */
export interface KeyValue {
  key: Buffer;
  value: Buffer;
}

/** Limits of one etcd transaction. */
export interface BatchLimits {
  /** Maximum operations per transaction. etcd 3.4 rejects more than 128 (its --max-txn-ops default). */
  maxOperations: number;
  /** Maximum sum of key and value bytes per transaction. etcd 3.4 rejects requests over 1.5 MiB (--max-request-bytes). */
  maxBytes: number;
}

/**
 * Limits that leave room under etcd's defaults for the transaction's compare
 * and the request's framing.
 */
export const defaultBatchLimits: BatchLimits = { maxOperations: 120, maxBytes: 1024 * 1024 };

/**
 * Splits `entries` in order into batches that each fit one transaction. An
 * entry larger than `maxBytes` on its own gets a batch of its own, so the
 * caller must bound entry sizes below etcd's request limit.
 */
export function splitIntoBatches<Entry extends KeyValue>(entries: readonly Entry[], limits: BatchLimits): Entry[][] {
  const batches: Entry[][] = [];
  let batch: Entry[] = [];
  let batchBytes = 0;
  for (const entry of entries) {
    const entryBytes = entry.key.length + entry.value.length;
    const full = batch.length >= limits.maxOperations || batchBytes + entryBytes > limits.maxBytes;
    if (batch.length > 0 && full) {
      batches.push(batch);
      batch = [];
      batchBytes = 0;
    }
    batch.push(entry);
    batchBytes += entryBytes;
  }
  if (batch.length > 0) batches.push(batch);
  return batches;
}
