import type { WatchSyncStatusResponseSchema } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import type { SyncStatusFeed } from "../state/sync-status-feed.js";
import type { CallContext } from "./call-context.js";
import type { SendMessage } from "./grpc-adapter.js";

/**
 * Streams the sync status: the current one at once, then the latest after
 * each change. While the client is slow to read, changes only mark the status
 * as stale, so at most one message waits per subscriber. Ends with the
 * signal's reason: CANCELLED when the client leaves, UNAVAILABLE at shutdown.
 */
export async function streamSyncStatus(
  feed: SyncStatusFeed,
  context: CallContext,
  send: SendMessage<typeof WatchSyncStatusResponseSchema>,
): Promise<void> {
  const { signal } = context;
  let stale = true;
  let wake: (() => void) | undefined;
  const unsubscribe = feed.subscribe(() => {
    stale = true;
    wake?.();
  });
  const onAbort = (): void => wake?.();
  signal.addEventListener("abort", onAbort);
  try {
    while (!signal.aborted) {
      if (stale) {
        stale = false;
        await send({ status: feed.current() });
        continue;
      }
      await new Promise<void>((resolve) => {
        wake = resolve;
      });
      wake = undefined;
    }
    throw signal.reason;
  } finally {
    signal.removeEventListener("abort", onAbort);
    unsubscribe();
  }
}
