import { createServer } from "node:net";

/** Asks the kernel for a free loopback TCP port. */
export async function findFreePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      if (address === null || typeof address === "string") {
        reject(new Error("cannot read the port of a loopback listener"));
        return;
      }
      server.close(() => resolve(address.port));
    });
  });
}
