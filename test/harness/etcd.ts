import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { noop } from "cockatiel";
import { Etcd3 } from "etcd3";
import { findFreePort } from "./free-port.js";

const etcdBinary = process.env["ETCD_BINARY"] ?? "etcd";
const startTimeoutMs = 20_000;

/** A throwaway single-node etcd on loopback, with its own data folder. */
export class EtcdProcess {
  private child: ChildProcess | undefined;
  private output = "";

  private constructor(
    readonly dataDir: string,
    readonly clientPort: number,
    readonly peerPort: number,
  ) {}

  /** Starts etcd on free ports and resolves once it serves requests. */
  static async start(): Promise<EtcdProcess> {
    const dataDir = await mkdtemp(join(tmpdir(), "modelmesh-etcd-"));
    const etcd = new EtcdProcess(dataDir, await findFreePort(), await findFreePort());
    await etcd.resume();
    return etcd;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${this.clientPort}`;
  }

  /** Starts etcd again on the same ports and data folder after `kill()`. */
  async resume(): Promise<void> {
    if (this.child !== undefined) throw new Error(`etcd on ${this.endpoint} is already running; kill() it first`);
    const clientUrl = this.endpoint;
    const peerUrl = `http://127.0.0.1:${this.peerPort}`;
    this.output = "";
    const child = spawn(
      etcdBinary,
      [
        "--name", "default",
        "--data-dir", this.dataDir,
        "--listen-client-urls", clientUrl,
        "--advertise-client-urls", clientUrl,
        "--listen-peer-urls", peerUrl,
        "--initial-advertise-peer-urls", peerUrl,
        "--initial-cluster", `default=${peerUrl}`,
        "--log-level", "warn",
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    child.stdout?.on("data", (chunk: Buffer) => this.keepOutput(chunk));
    child.stderr?.on("data", (chunk: Buffer) => this.keepOutput(chunk));
    this.child = child;
    await this.waitUntilServing(child);
  }

  /** Stops etcd at once with SIGKILL, keeping its data folder. */
  async kill(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (child === undefined || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  }

  /** Stops etcd and deletes its data folder. */
  async stop(): Promise<void> {
    await this.kill();
    await rm(this.dataDir, { recursive: true, force: true });
  }

  private keepOutput(chunk: Buffer): void {
    // Only the tail is kept: it is shown when etcd fails to start.
    this.output = (this.output + chunk.toString("utf8")).slice(-4000);
  }

  private async waitUntilServing(child: ChildProcess): Promise<void> {
    // Without the no-op policies, etcd3's circuit breaker keeps reporting etcd as down for 5 s after it is back.
    const client = new Etcd3({
      hosts: this.endpoint,
      defaultCallOptions: () => ({ deadline: Date.now() + 1000 }),
      faultHandling: { host: () => noop, global: noop },
    });
    const deadline = Date.now() + startTimeoutMs;
    try {
      while (Date.now() < deadline) {
        if (child.exitCode !== null) {
          throw new Error(`etcd exited with code ${child.exitCode} while starting:\n${this.output}`);
        }
        try {
          await client.get("modelmesh-harness-probe").string();
          return;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
      throw new Error(`etcd did not serve ${this.endpoint} within ${startTimeoutMs} ms:\n${this.output}`);
    } finally {
      client.close();
    }
  }
}
