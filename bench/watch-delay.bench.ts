import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { EntityKind } from "../src/gen/modelmesh/state/v1/changes_pb.js";
import { etcdConfigYaml, startInProcessDaemon, uniquePrefix, type InProcessDaemon } from "../test/harness/in-process-daemon.js";

const rounds = 100;
let daemons: InProcessDaemon[] = [];

beforeAll(async () => {
  const prefix = uniquePrefix("bench-watch");
  for (let index = 0; index < 2; index++) {
    daemons.push(await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), "immediate", { prefix })));
  }
});

afterAll(async () => {
  await Promise.all(daemons.map((running) => running.stop()));
  daemons = [];
});

function percentile(sorted: number[], fraction: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * fraction))]!;
}

describe("change-to-subscriber delay", () => {
  it("measures UpdateState on one daemon to WatchState on another", async () => {
    const [writer, watched] = daemons as [InProcessDaemon, InProcessDaemon];
    const stream = watched.client.watchState({ kinds: [EntityKind.MODEL], ids: ["cooled"] });
    await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the snapshot");
    const delaysMs: number[] = [];

    for (let round = 0; round < rounds; round++) {
      const cooldownUntil = timestampFromDate(new Date(Date.now() + 60_000 + round));
      const seen = stream.messages.length;
      const sentAt = performance.now();
      const response = await writer.client.updateState({ models: [{ id: "cooled", keepLatest: { cooldownUntil } }] });
      await stream.waitFor(
        (message) => stream.messages.indexOf(message) >= seen && message.revision >= response.revision,
        5000,
        `round ${round}`,
      );
      delaysMs.push(performance.now() - sentAt);
    }
    stream.call.cancel();

    const sorted = [...delaysMs].sort((a, b) => a - b);
    console.log(
      `UpdateState on daemon A to WatchState on daemon B, ${rounds} rounds (including the commit): ` +
        `p50 ${percentile(sorted, 0.5).toFixed(1)} ms, p95 ${percentile(sorted, 0.95).toFixed(1)} ms, max ${sorted.at(-1)!.toFixed(1)} ms`,
    );
    expect(delaysMs).toHaveLength(rounds);
  });
});
