// Node's ws as a reference for the benchmarks: the server a user would pick instead.
//
// Run: node bench/ws_server.js echo|broadcast [--port PORT]   (bench/ installs ws itself)
// "broadcast" speaks 3_websocket_broadcast.py's protocol byte for byte (welcome, message
// events with an id, batched presence) and keeps its promises: history, the same
// slow-client cut-off. Compression off, as in the demos (ws's server default too).
"use strict";

const path = require("path");
const { WebSocketServer, WebSocket } = require(
  path.join(__dirname, ".node", "node_modules", "ws"),
);

const [mode, ...rest] = process.argv.slice(2);
const port = rest[0] === "--port" ? Number(rest[1]) : 0;
const MAX_TEXT = 1000;
const MAX_BACKLOG = 1024 * 1024;
const TIMEOUT = 5000;
const HISTORY = 100;

// Python's json.dumps(): ", " and ": " separators, non-ASCII escaped, so that the
// receivers parse the same bytes from this server as from the demo.
function dumps(value) {
  if (Array.isArray(value)) return `[${value.map(dumps).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value)
      .map(([k, v]) => `${dumps(k)}: ${dumps(v)}`)
      .join(", ")}}`;
  }
  if (typeof value === "string") {
    return JSON.stringify(value).replace(
      /[\u007f-\uffff]/g,
      (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
    );
  }
  return JSON.stringify(value);
}

const wss = new WebSocketServer({ host: "127.0.0.1", port, maxPayload: 64 * 1024 });
const clients = new Map(); // socket -> client number
const history = [];
const joined = [];
const left = [];
const started = Date.now();
let nextClient = 1;
let nextMessage = 1;

function sendToAll(event) {
  const data = Buffer.from(dumps(event)); // encoded once, sent to everyone
  for (const ws of clients.keys()) {
    if (ws.readyState === WebSocket.OPEN) ws.send(data, { binary: false });
  }
  for (const [ws, client] of clients) {
    if (ws.bufferedAmount > MAX_BACKLOG) {
      clients.delete(ws);
      console.error(`client #${client} is over ${MAX_BACKLOG} bytes behind: disconnecting it`);
      ws.close(1008, "too slow");
      setTimeout(() => ws.terminate(), TIMEOUT).unref();
    }
  }
}

function announce(kind, client) {
  if (joined.length === 0 && left.length === 0) {
    setTimeout(() => {
      sendToAll({ type: "presence", clients: clients.size, joined: [...joined], left: [...left] });
      joined.length = 0;
      left.length = 0;
    }, 200);
  }
  (kind === "joined" ? joined : left).push(client);
}

function problemWith(data, isBinary) {
  if (isBinary) return "binary messages are not supported: send text";
  const text = data.toString();
  if (!text.trim()) return "empty message: type something first";
  if (text.length > MAX_TEXT) {
    return `message too long: ${text.length} characters, the limit is ${MAX_TEXT}`;
  }
  return null;
}

function broadcastHandler(ws) {
  const client = nextClient++;
  clients.set(ws, client);
  ws.send(
    dumps({
      type: "welcome",
      client,
      clients: clients.size,
      history: history.slice(-20),
      recovered: false,
    }),
  );
  announce("joined", client);
  ws.on("message", (data, isBinary) => {
    const problem = problemWith(data, isBinary);
    if (problem) return ws.send(dumps({ type: "error", reason: problem }));
    const event = { type: "message", id: `${started}-${nextMessage++}`, client, text: data.toString() };
    history.push(event);
    if (history.length > HISTORY) history.shift();
    sendToAll(event);
  });
  ws.on("close", () => {
    clients.delete(ws); // already gone if it was cut off as too slow
    announce("left", client);
  });
}

function echoHandler(ws) {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
}

wss.on("connection", (ws) => {
  ws.on("error", () => {}); // a client that vanishes is normal; "close" follows
  (mode === "broadcast" ? broadcastHandler : echoHandler)(ws);
});
wss.on("listening", () => {
  console.log(`Listening on ws://127.0.0.1:${wss.address().port} (Ctrl+C to stop)`);
});
process.on("SIGTERM", () => process.exit(0));
