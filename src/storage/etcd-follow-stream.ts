import type { Etcd3, IDuplexStream, IEvent, IWatchCreateRequest, IWatchRequest, IWatchResponse } from "etcd3";

/** Receiver of what one watch stream reports, in the order etcd sent it. */
export interface FollowStreamListener {
  /** etcd accepted the watch. */
  created(): void;
  /**
   * One whole watch response: `events` of whole revisions in revision order,
   * with the fragments of a split response joined, or no events for a
   * progress notification.
   */
  response(events: IEvent[], headerRevision: bigint, fragments: number): void;
  /** etcd cancelled the watch. `compactRevision` is above 0 when the start revision was compacted. */
  cancelled(reason: string, compactRevision: bigint): void;
  /** The stream failed or ended, and nothing more arrives from it. */
  lost(error: Error): void;
}

/**
 * One etcd watch on one gRPC stream, used directly instead of etcd3's
 * `Watcher`. After a reconnect, etcd3 1.1.2's `Watcher` resumes from the
 * header revision of its last response plus one. That includes the `created`
 * response, whose header is the store's revision at creation, not the
 * revision up to which events were delivered, so resuming from there can skip
 * events. The owner of this stream decides where each watch starts.
 */
export class EtcdFollowStream {
  private watchId: string | undefined;
  /** Events of the fragments of a split response received so far. */
  private fragments: IEvent[][] = [];
  /** False once the listener heard of a cancel or a loss, or the owner closed the stream. */
  private delivering = true;
  private ended = false;

  private constructor(
    private readonly stream: IDuplexStream<IWatchRequest, IWatchResponse>,
    private readonly listener: FollowStreamListener,
  ) {}

  /** Opens a stream and sends the create request. Everything etcd sends afterwards reaches `listener`. */
  static async open(client: Etcd3, request: IWatchCreateRequest, listener: FollowStreamListener): Promise<EtcdFollowStream> {
    const stream = await client.watchClient.watch();
    const followStream = new EtcdFollowStream(stream, listener);
    stream.on("data", (response) => followStream.receive(response));
    stream.on("error", (error) => followStream.fail(error));
    stream.on("end", () => followStream.fail(new Error("etcd ended the watch stream")));
    stream.write({ create_request: request });
    return followStream;
  }

  /** Cancels the gRPC call. The listener receives nothing more. */
  close(): void {
    this.delivering = false;
    if (this.ended) return;
    this.ended = true;
    // Half-closing first makes the stream not writable, and etcd3 1.1.2 reports a stream error to its
    // fault handling only while the stream is writable. So the CANCELLED status of our own cancel does
    // not reset the client's connections.
    this.stream.end();
    this.stream.cancel();
  }

  private receive(response: IWatchResponse): void {
    if (!this.delivering) return;
    if (response.created) {
      // etcd sets `created` and `canceled` together when it rejects the create request, such as for an empty key range.
      // A compacted start revision is reported later, in a cancel response of its own.
      if (response.canceled) {
        this.cancel(response);
        return;
      }
      this.watchId = response.watch_id;
      this.listener.created();
      return;
    }
    // Each stream carries one watch, so a response for another id is not ours (etcd sends -1 for progress requests).
    if (response.watch_id !== this.watchId) return;
    if (response.canceled) {
      this.cancel(response);
      return;
    }
    if (response.fragment) {
      this.fragments.push(response.events);
      return;
    }
    const fragments = this.fragments.length + 1;
    const events = fragments === 1 ? response.events : [...this.fragments.flat(), ...response.events];
    this.fragments = [];
    this.listener.response(events, BigInt(response.header.revision), fragments);
  }

  private cancel(response: IWatchResponse): void {
    this.delivering = false;
    this.listener.cancelled(response.cancel_reason, BigInt(response.compact_revision || "0"));
  }

  private fail(error: Error): void {
    this.ended = true;
    if (!this.delivering) return;
    this.delivering = false;
    // Fragments of an unfinished response are dropped: the next watch starts before their revision.
    this.fragments = [];
    this.listener.lost(error);
  }
}
