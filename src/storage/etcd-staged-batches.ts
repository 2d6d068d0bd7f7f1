import type { CallOptions } from "@grpc/grpc-js";
import type { Etcd3 } from "etcd3";
import type { KeyValue } from "./etcd-batches.js";
import { keyExists } from "./etcd-change-txn.js";

/** Entity transactions of one generation in flight at once. */
const writeConcurrency = 4;

export interface StagedBatchWrite {
  client: Etcd3;
  /** The writer's staging lease key: each transaction applies only while it exists. */
  stagingLeaseKey: Buffer;
  batches: KeyValue[][];
  /** Called before each transaction; throws to stop the write, for example on abort. */
  checkActive(): void;
  /** Returns the error for a transaction that found the staging lease key gone. */
  leaseExpired(): Error;
  /** Options of each transaction call, such as its deadline. */
  callOptions?(): CallOptions;
}

/**
 * Writes the entity keys of a staged generation, four transactions at a
 * time. Each transaction applies only while the writer's staging lease key
 * exists, so a writer whose lease expired cannot recreate keys after orphan
 * removal deleted its generation. Resolves or rejects only when no
 * transaction is in flight any more, so the caller can discard the
 * generation safely.
 */
export async function writeStagedBatches(write: StagedBatchWrite): Promise<void> {
  let next = 0;
  let failed = false;
  const writeUntilDone = async (): Promise<void> => {
    while (!failed && next < write.batches.length) {
      const index = next++;
      write.checkActive();
      const response = await write.client.kv.txn(
        {
          compare: [keyExists(write.stagingLeaseKey)],
          success: write.batches[index]!.map((entry) => ({ request_put: { key: entry.key, value: entry.value } })),
        },
        write.callOptions?.(),
      );
      if (!response.succeeded) throw write.leaseExpired();
    }
  };
  const workers = Array.from({ length: Math.min(writeConcurrency, write.batches.length) }, () =>
    writeUntilDone().catch((error: unknown) => {
      failed = true;
      throw error;
    }),
  );
  const results = await Promise.allSettled(workers);
  const rejected = results.find((result) => result.status === "rejected");
  if (rejected !== undefined) throw rejected.reason;
}
