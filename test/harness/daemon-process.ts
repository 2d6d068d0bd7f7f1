import { spawn, type ChildProcess } from "node:child_process";
import { access, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** Entry point of the compiled daemon, which `npm run build` writes. */
const daemonEntryPoint = fileURLToPath(new URL("../../dist/main.js", import.meta.url));
const startedMessage = "state daemon started";
const outputTailChars = 4000;

/** Children still running, killed when the test process exits. */
const runningChildren = new Set<ChildProcess>();

// Kills daemons that a failed or interrupted test left behind. Handlers of
// "exit" must be synchronous, so this sends SIGKILL without waiting.
process.once("exit", () => {
  for (const child of runningChildren) child.kill("SIGKILL");
});

export interface DaemonStartOptions {
  /** YAML text of the configuration file passed with `--config`. */
  configYaml: string;
  /** Variables added to the daemon's environment, such as MODELMESH_LOG_LEVEL. */
  env?: Record<string, string>;
  /**
   * Working folder of the daemon, kept after it exits so that a second daemon
   * can reuse it. Default: a new temporary folder, deleted when the daemon exits.
   */
  workDir?: string;
  /** Time to wait for the "state daemon started" log line. Default 20 s. */
  startTimeoutMs?: number;
}

/** One JSON log line of the daemon, as pino writes it. */
export type DaemonLogLine = Record<string, unknown> & { msg?: string; level?: number };

/**
 * The daemon run from dist/ as a child process, listening on a free loopback
 * port. Every process still running is killed by `DaemonProcess.killAll()`,
 * meant for `afterEach`, and at the latest when the test process exits.
 */
export class DaemonProcess {
  private static readonly running = new Set<DaemonProcess>();

  private readonly logLines: DaemonLogLine[] = [];
  private outputTail = "";
  private pendingStdout = "";
  private readonly exited: Promise<number | null>;
  /** Exit code, undefined while the process runs and null when a signal ended it. */
  private exitCode: number | null | undefined;
  private listenAddress = "";
  private listenPort = 0;

  private constructor(private readonly child: ChildProcess) {
    runningChildren.add(child);
    DaemonProcess.running.add(this);
    this.exited = new Promise((resolve) => {
      // "close" comes after the last stdout and stderr data, unlike "exit".
      child.once("close", (code) => {
        this.exitCode = code;
        runningChildren.delete(child);
        DaemonProcess.running.delete(this);
        resolve(code);
      });
    });
    child.on("error", (error) => this.keepOutput(`cannot run the daemon: ${error.message}\n`));
    child.stdout?.on("data", (chunk: Buffer) => this.readStdout(chunk));
    child.stderr?.on("data", (chunk: Buffer) => this.keepOutput(chunk.toString("utf8")));
  }

  /** HOST:PORT that the daemon listens on, from its "state daemon started" log line. */
  get address(): string {
    return this.listenAddress;
  }

  /** Port that the kernel chose for the daemon's `127.0.0.1:0` listener. */
  get port(): number {
    return this.listenPort;
  }

  /**
   * Writes `configYaml` to a temporary file and starts
   * `node dist/main.js --config FILE --listen 127.0.0.1:0`.
   * Resolves once the daemon logs "state daemon started". Rejects with the
   * tail of its output when it exits first or the start timeout passes.
   */
  static async start(options: DaemonStartOptions): Promise<DaemonProcess> {
    try {
      await access(daemonEntryPoint);
    } catch {
      throw new Error(`daemon entry point ${daemonEntryPoint} not found; run npm run build before the tests`);
    }
    const tempDir = await mkdtemp(join(tmpdir(), "modelmesh-daemon-"));
    const configPath = join(tempDir, "config.yaml");
    await writeFile(configPath, options.configYaml, "utf8");
    const workDir = options.workDir ?? join(tempDir, "work");
    await mkdir(workDir, { recursive: true });

    const child = spawn(process.execPath, [daemonEntryPoint, "--config", configPath, "--listen", "127.0.0.1:0"], {
      cwd: workDir,
      env: { ...inheritedEnvironment(), ...options.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const daemon = new DaemonProcess(child);
    void daemon.exited.then(() => rm(tempDir, { recursive: true, force: true })).catch(() => undefined);

    try {
      await daemon.waitForStart(options.startTimeoutMs ?? 20_000);
    } catch (error) {
      await daemon.kill();
      throw error;
    }
    return daemon;
  }

  /** Kills every daemon still running with SIGKILL and waits for them to exit. */
  static async killAll(): Promise<void> {
    await Promise.all([...DaemonProcess.running].map((daemon) => daemon.kill()));
  }

  /**
   * Sends `signal` and resolves with the exit code, or null when a signal
   * ended the process. Kills the daemon with SIGKILL and rejects when it has
   * not exited after `timeoutMs` (default 20 s, above the daemon's 10 s
   * default shutdown timeout).
   */
  async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 20_000): Promise<number | null> {
    if (this.exitCode !== undefined) return this.exitCode;
    this.child.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const outcome = await Promise.race([this.exited, timedOut]);
    clearTimeout(timer);
    if (outcome === "timeout") {
      await this.kill();
      throw new Error(`daemon ${this.address} did not exit within ${timeoutMs} ms of ${signal}; output tail:\n${this.outputTail}`);
    }
    return outcome;
  }

  /** Kills the daemon with SIGKILL, as a crash would end it, and waits for it to exit. */
  async kill(): Promise<void> {
    if (this.exitCode !== undefined) return;
    this.child.kill("SIGKILL");
    await this.exited;
  }

  /** Parsed JSON lines that the daemon wrote to stdout so far. */
  logs(): DaemonLogLine[] {
    return [...this.logLines];
  }

  /** Returns the last 4000 characters of stdout and stderr, for failure messages. */
  output(): string {
    return this.outputTail;
  }

  private async waitForStart(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const started = this.logLines.find((line) => line.msg === startedMessage);
      if (started !== undefined) {
        this.readAddress(started);
        return;
      }
      if (this.exitCode !== undefined) {
        throw new Error(`daemon exited with code ${String(this.exitCode)} before it started; output tail:\n${this.outputTail}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error(`daemon did not log "${startedMessage}" within ${timeoutMs} ms; output tail:\n${this.outputTail}`);
  }

  private readAddress(started: DaemonLogLine): void {
    const address = started["address"];
    const port = typeof address === "string" ? Number(/:(\d+)$/.exec(address)?.[1]) : Number.NaN;
    if (typeof address !== "string" || !(port > 0)) {
      throw new Error(`the "${startedMessage}" log line has no address HOST:PORT: ${JSON.stringify(started)}`);
    }
    this.listenAddress = address;
    this.listenPort = port;
  }

  private readStdout(chunk: Buffer): void {
    const text = chunk.toString("utf8");
    this.keepOutput(text);
    // A chunk may end inside a line, which then waits for the next chunk.
    const lines = (this.pendingStdout + text).split("\n");
    this.pendingStdout = lines.pop() ?? "";
    for (const line of lines) {
      if (!line.startsWith("{")) continue;
      try {
        this.logLines.push(JSON.parse(line) as DaemonLogLine);
      } catch {
        // A line that is not JSON stays visible in output() only.
      }
    }
  }

  private keepOutput(text: string): void {
    this.outputTail = (this.outputTail + text).slice(-outputTailChars);
  }
}

/**
 * Returns this process's environment without MODELMESH_* variables, so that
 * a developer's shell settings cannot change the configuration under test.
 */
function inheritedEnvironment(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("MODELMESH_")));
}
