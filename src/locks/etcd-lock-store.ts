import {
  CompareResult,
  CompareTarget,
  SortOrder,
  SortTarget,
  type Etcd3,
  type ICompare,
  type IKeyValue,
  type IRangeRequest,
  type Watcher,
} from "etcd3";

/** The JSON value of a queue key. */
export interface QueueEntryValue {
  owner: string;
  /** When the acquire was called, as an ISO 8601 timestamp. */
  requestedAt: string;
  /** When the acquiring daemon saw the lock granted; absent while the entry waits. */
  acquiredAt?: string;
}

/** One key of a lock queue, decoded. */
export interface QueueEntry {
  key: Buffer;
  /** Lease id in hex, which is also the last segment of the key. */
  lockId: string;
  /** Lease id in decimal, as etcd3 passes int64 values. */
  leaseId: string;
  /** Create revision of the key: its place in the queue and its fencing token. */
  token: bigint;
  value: QueueEntryValue | undefined;
}

/** The head of a lock queue at one revision. */
export interface QueueHead {
  head: QueueEntry | undefined;
  /** Keys in the queue, the head included. */
  count: number;
  revision: bigint;
}

/** Position of an entry in its queue at one revision. */
export type QueuePosition =
  | { kind: "gone"; revision: bigint }
  | { kind: "first"; revision: bigint }
  | { kind: "behind"; predecessorKey: Buffer; revision: bigint };

/** A lease that `grantLease` created. */
export interface GrantedLease {
  leaseId: string;
  lockId: string;
  ttlSeconds: number;
}

/**
 * The etcd requests of the lock queues, each bounded by the request timeout.
 * The layout follows the queue recipe of etcd's Go `concurrency.Mutex`
 * (client/v3/concurrency/mutex.go): each caller creates one key under
 * `{prefix}/locks/{name}/`, attached to its own lease, and the key with the
 * lowest create revision holds the lock. Errors are the etcd client's own;
 * callers turn them into service errors that name the lock.
 */
export class EtcdLockStore {
  constructor(
    private readonly client: Etcd3,
    private readonly prefix: string,
    private readonly requestTimeoutMs: number,
  ) {}

  queuePrefix(name: string): Buffer {
    return Buffer.from(`${this.prefix}/locks/${name}/`, "utf8");
  }

  entryKey(name: string, lockId: string): Buffer {
    return Buffer.from(`${this.prefix}/locks/${name}/${lockId}`, "utf8");
  }

  /**
   * Grants a lease of at least `ttlSeconds`. etcd raises a TTL below its
   * minimum (2 s with the default election timeout of etcd 3.4), and the
   * reply carries the TTL it applied.
   */
  async grantLease(ttlSeconds: number): Promise<GrantedLease> {
    const response = await this.client.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }, this.callOptions());
    if (response.error !== "") throw new Error(`etcd rejected the lease grant: ${response.error}`);
    return { leaseId: response.ID, lockId: BigInt(response.ID).toString(16), ttlSeconds: Number(response.TTL) };
  }

  /** Revokes a lease, which deletes the keys attached to it. */
  async revokeLease(leaseId: string): Promise<void> {
    await this.client.leaseClient.leaseRevoke({ ID: leaseId }, this.callOptions());
  }

  /**
   * Sends one keepalive and returns the TTL etcd restarted the lease with,
   * in seconds; 0 or less means the lease no longer exists.
   */
  async keepAliveOnce(leaseId: string): Promise<number> {
    const stream = await this.client.leaseClient.leaseKeepAlive(this.callOptions());
    return await new Promise<number>((resolve, reject) => {
      stream.on("data", (response) => {
        // Half-closing ends the call cleanly. Cancelling it instead would make etcd3 1.1.2 treat
        // the CANCELLED status as a host failure and reset every stream on that host, watches included.
        stream.end();
        resolve(Number(response.TTL));
      });
      stream.on("error", reject);
      stream.on("end", () => reject(new Error("the keepalive stream ended without a reply")));
      stream.write({ ID: leaseId });
    });
  }

  /** Returns the remaining TTL of a lease in whole seconds, rounded down; -1 when it has expired. */
  async leaseTimeToLive(leaseId: string): Promise<number> {
    const response = await this.client.leaseClient.leaseTimeToLive({ ID: leaseId }, this.callOptions());
    return Number(response.TTL);
  }

  /** Creates the queue key of a new lease and returns its create revision. */
  async createEntry(key: Buffer, lease: GrantedLease, value: QueueEntryValue): Promise<bigint> {
    const response = await this.client.kv.txn(
      {
        compare: [keyAbsent(key)],
        success: [{ request_put: { key, value: encodeValue(value), lease: lease.leaseId } }],
      },
      this.callOptions(),
    );
    if (!response.succeeded) {
      throw new Error(`the queue key "${key.toString()}" of a new lease exists already`);
    }
    // The put is the only write of the transaction, so the key was created at the revision in the header.
    return BigInt(response.header.revision);
  }

  /**
   * Finds the entry just ahead of `key`: the key with the greatest create
   * revision below `token`. The entry is gone when its key was deleted or
   * recreated.
   */
  async readPosition(name: string, key: Buffer, token: bigint): Promise<QueuePosition> {
    const prefix = this.queuePrefix(name);
    const response = await this.client.kv.txn(
      {
        compare: [createdAt(key, token)],
        success: [
          {
            request_range: {
              key: prefix,
              range_end: prefixRangeEnd(prefix),
              max_create_revision: (token - 1n).toString(),
              sort_target: SortTarget.Create,
              sort_order: SortOrder.Descend,
              limit: 1,
              keys_only: true,
            },
          },
        ],
      },
      this.callOptions(),
    );
    const revision = BigInt(response.header.revision);
    if (!response.succeeded) return { kind: "gone", revision };
    const predecessor = response.responses[0]?.response_range.kvs[0];
    return predecessor === undefined ? { kind: "first", revision } : { kind: "behind", predecessorKey: predecessor.key, revision };
  }

  /** Rewrites the value of `key` if it is still the key created at `token`; returns whether it was. */
  async updateEntry(key: Buffer, token: bigint, leaseId: string, value: QueueEntryValue): Promise<boolean> {
    const response = await this.client.kv.txn(
      {
        compare: [createdAt(key, token)],
        success: [{ request_put: { key, value: encodeValue(value), lease: leaseId } }],
      },
      this.callOptions(),
    );
    return response.succeeded;
  }

  async readEntry(key: Buffer): Promise<QueueEntry | undefined> {
    const response = await this.client.kv.range({ key }, this.callOptions());
    const found = response.kvs[0];
    return found === undefined ? undefined : decodeEntry(found);
  }

  /** Reads the head of the queue and the number of keys in it, at one revision. */
  async readHead(name: string): Promise<QueueHead> {
    const prefix = this.queuePrefix(name);
    const range: IRangeRequest = { key: prefix, range_end: prefixRangeEnd(prefix) };
    const response = await this.client.kv.txn(
      {
        success: [
          { request_range: { ...range, sort_target: SortTarget.Create, sort_order: SortOrder.Ascend, limit: 1 } },
          { request_range: { ...range, count_only: true } },
        ],
      },
      this.callOptions(),
    );
    const head = response.responses[0]?.response_range.kvs[0];
    return {
      head: head === undefined ? undefined : decodeEntry(head),
      count: Number(response.responses[1]?.response_range.count ?? 0),
      revision: BigInt(response.header.revision),
    };
  }

  /** Reads `key` and the head of its queue at one revision. */
  async readEntryAndHead(name: string, key: Buffer): Promise<{ entry: QueueEntry | undefined; head: QueueEntry | undefined }> {
    const prefix = this.queuePrefix(name);
    const response = await this.client.kv.txn(
      {
        success: [
          { request_range: { key } },
          {
            request_range: {
              key: prefix,
              range_end: prefixRangeEnd(prefix),
              sort_target: SortTarget.Create,
              sort_order: SortOrder.Ascend,
              limit: 1,
            },
          },
        ],
      },
      this.callOptions(),
    );
    const entry = response.responses[0]?.response_range.kvs[0];
    const head = response.responses[1]?.response_range.kvs[0];
    return {
      entry: entry === undefined ? undefined : decodeEntry(entry),
      head: head === undefined ? undefined : decodeEntry(head),
    };
  }

  /**
   * Starts watching `key` for its deletion from `startRevision` on, so a
   * delete between a read at `startRevision - 1` and the watch is replayed.
   * The watcher is returned unconnected, so the caller can attach its
   * listeners before any event arrives. `WatchBuilder.create()` resolves
   * only after the watcher connected, and a replayed event may come first.
   */
  watchDelete(key: Buffer, startRevision: bigint): Watcher {
    return this.client.watch().key(key).startRevision(startRevision.toString()).only("delete").watcher();
  }

  /** Starts watching every key of a queue from `startRevision` on, unconnected for the reason `watchDelete` gives. */
  watchQueue(name: string, startRevision: bigint): Watcher {
    return this.client.watch().prefix(this.queuePrefix(name)).startRevision(startRevision.toString()).watcher();
  }

  private callOptions(): { deadline: number } {
    return { deadline: Date.now() + this.requestTimeoutMs };
  }
}

/** Returns the end of the key range of every key that starts with `prefix`. */
function prefixRangeEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let index = end.length - 1; index >= 0; index--) {
    if (end[index] < 0xff) {
      end[index] += 1;
      return end.subarray(0, index + 1);
    }
  }
  // A prefix of only 0xff bytes has no upper bound, which etcd writes as "\0".
  return Buffer.from([0]);
}

function keyAbsent(key: Buffer): ICompare {
  return { key, target: CompareTarget.Create, result: CompareResult.Equal, create_revision: 0 };
}

function createdAt(key: Buffer, token: bigint): ICompare {
  return { key, target: CompareTarget.Create, result: CompareResult.Equal, create_revision: token.toString() };
}

function encodeValue(value: QueueEntryValue): Buffer {
  return Buffer.from(JSON.stringify(value), "utf8");
}

function decodeEntry(kv: IKeyValue): QueueEntry {
  const keyText = kv.key.toString("utf8");
  return {
    key: kv.key,
    lockId: keyText.slice(keyText.lastIndexOf("/") + 1),
    leaseId: kv.lease,
    token: BigInt(kv.create_revision),
    value: decodeValue(kv.value),
  };
}

/** Returns the decoded value, or undefined for a value that some other writer put under the queue prefix. */
function decodeValue(raw: Buffer): QueueEntryValue | undefined {
  try {
    const parsed: unknown = JSON.parse(raw.toString("utf8"));
    if (typeof parsed !== "object" || parsed === null) return undefined;
    const { owner, requestedAt, acquiredAt } = parsed as Record<string, unknown>;
    if (typeof owner !== "string" || typeof requestedAt !== "string") return undefined;
    return typeof acquiredAt === "string" ? { owner, requestedAt, acquiredAt } : { owner, requestedAt };
  } catch {
    return undefined;
  }
}
