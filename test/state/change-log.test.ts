import { describe, expect, it } from "vitest";
import { EntityKind } from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import { ChangeLog, type ChangeLogRead } from "../../src/state/change-log.js";
import type { EntityEvent } from "../../src/state/entity.js";

/** Returns the events of a read, failing the test when the read was too old. */
function eventsRead(read: ChangeLogRead): { events: EntityEvent[]; revision: bigint } {
  if (read.kind !== "events") throw new Error(`expected events, got a too-old read at ${read.oldestRevision}`);
  return read;
}

function events(revision: bigint, count: number): EntityEvent[] {
  return Array.from({ length: count }, (_, index) => ({ revision, kind: EntityKind.MODEL, id: `m${index}`, value: undefined }));
}

describe("ChangeLog.readAfter()", () => {
  it("returns a large revision whole", () => {
    const log = new ChangeLog(10n);
    log.append(events(11n, 2000), 11n);
    log.append(events(12n, 3), 12n);

    const first = log.readAfter(10n, 500);
    expect(first.kind).toBe("events");
    if (first.kind !== "events") return;
    expect(first.events).toHaveLength(2000);
    expect(first.revision).toBe(11n);

    const second = eventsRead(log.readAfter(first.revision, 500));
    expect(second.events).toHaveLength(3);
    expect(second.revision).toBe(12n);
  });

  it("splits pages only between revisions", () => {
    const log = new ChangeLog(0n);
    for (let revision = 1n; revision <= 10n; revision++) log.append(events(revision, 3), revision);

    const page = eventsRead(log.readAfter(0n, 4));
    expect(page.events.map((event) => event.revision)).toEqual([1n, 1n, 1n, 2n, 2n, 2n]);
    expect(page.revision).toBe(2n);
  });

  it("reports the latest revision after progress without events", () => {
    const log = new ChangeLog(5n);
    log.advance(9n);
    const read = log.readAfter(5n, 100);
    expect(read).toEqual({ kind: "events", events: [], revision: 9n });
  });

  it("answers too-old once events were dropped", () => {
    const log = new ChangeLog(0n, { maxEvents: 4 });
    for (let revision = 1n; revision <= 5n; revision++) log.append(events(revision, 2), revision);

    expect(log.readAfter(0n, 100).kind).toBe("too-old");
    const kept = eventsRead(log.readAfter(log.oldestResumableRevision, 100));
    expect(kept.events[0]?.revision).toBe(log.oldestResumableRevision + 1n);
  });

  it("forgets everything on reset", () => {
    const log = new ChangeLog(0n);
    log.append(events(1n, 2), 1n);
    log.reset(7n);
    expect(log.readAfter(1n, 100).kind).toBe("too-old");
    expect(log.readAfter(7n, 100)).toEqual({ kind: "events", events: [], revision: 7n });
  });
});
