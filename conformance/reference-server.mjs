// Starts the Node reference Durable Streams server (@durable-streams/server) for benchmarks.
// The package ships no command-line entry; this wraps DurableStreamTestServer.
//   node reference-server.mjs --port P [--host H] [--data-dir D] [--long-poll-timeout MS]
// With --data-dir the server is file-backed (segment files + fdatasync per append, LMDB
// metadata); without it everything lives in memory. Prints "listening <url>" once bound and
// stops cleanly on SIGTERM/SIGINT.
import { DurableStreamTestServer } from "@durable-streams/server";

function parseArgs(argv) {
  const opts = { port: 4437, host: "127.0.0.1" };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === "--port") opts.port = Number(value);
    else if (key === "--host") opts.host = value;
    else if (key === "--data-dir") opts.dataDir = value;
    else if (key === "--long-poll-timeout") opts.longPollTimeout = Number(value);
    else {
      console.error(`unknown argument: ${key}`);
      process.exit(2);
    }
    i++;
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const server = new DurableStreamTestServer({
  port: opts.port,
  host: opts.host,
  dataDir: opts.dataDir,
  longPollTimeout: opts.longPollTimeout,
});
const url = await server.start();
console.log(`listening ${url} mode=${opts.dataDir ? "file" : "memory"}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  try {
    await server.stop();
  } finally {
    process.exit(0);
  }
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
