// Sends a burst of unary roi.v1.RoIService/Pool calls all at once (as a busy Node.js client
// does) and, `--signal-after-ms` after the last one was issued, SIGTERMs the server's process.
// Prints one JSON object: the status code names of every call and the ids of those answered.
//
//   node burst.js --address 127.0.0.1:50051 --request req.bin --count 300 \
//        [--server-pid 1234 --signal-after-ms 40] [--deadline-s 60]
//
// The request is a serialised roi.v1.PoolRequest (written by the test); each call sends it
// with its own id ("b<i>").
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function parseArgs(argv) {
  const args = { count: 300, signalAfterMs: 40, deadlineS: 60, serverPid: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    args[key] = argv[i + 1];
  }
  for (const k of ["count", "signalAfterMs", "deadlineS", "serverPid"]) args[k] = Number(args[k]);
  return args;
}

const args = parseArgs(process.argv.slice(2));
const protoFile = path.resolve(__dirname, "..", "..", "protos", "roi", "v1", "roi.proto");
const definition = protoLoader.loadSync(protoFile, { keepCase: true, longs: String, enums: String, defaults: false, bytes: Buffer });
const roi = grpc.loadPackageDefinition(definition).roi.v1;
const template = definition["roi.v1.RoIService"].Pool.requestDeserialize(fs.readFileSync(args.request));

const client = new roi.RoIService(args.address, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 256 << 20,
  "grpc.max_send_message_length": 256 << 20,
});

const codeName = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

client.waitForReady(Date.now() + 30000, (err) => {
  if (err) {
    console.log(JSON.stringify({ error: `not connected: ${err.message}` }));
    process.exit(1);
  }
  const codes = new Array(args.count).fill(null);
  const answered = [];
  const messages = {};
  let pending = args.count;
  const deadline = new Date(Date.now() + args.deadlineS * 1000);
  for (let i = 0; i < args.count; i++) {
    const req = Object.assign({}, template, { id: `b${i}` });
    client.Pool(req, { deadline }, (err, resp) => {
      const code = err ? err.code : grpc.status.OK;
      codes[i] = codeName[code] || String(code);
      if (err) messages[codes[i]] = err.details;
      else if (resp.id === `b${i}`) answered.push(i);
      if (--pending === 0) {
        console.log(JSON.stringify({ codes, answered: answered.length, messages }));
        client.close();
      }
    });
  }
  if (args.serverPid > 0) {
    setTimeout(() => process.kill(args.serverPid, "SIGTERM"), args.signalAfterMs);
  }
});
