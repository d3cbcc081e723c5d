#!/usr/bin/env python3
"""delay_proxy.py - a TCP proxy that adds a fixed one-way delay in each direction.

    python3 bench/delay_proxy.py --listen 127.0.0.1:19000 --target 127.0.0.1:19001 --delay-ms 10

With --delay-ms 10 every byte reaches the other side 10 ms after the proxy read it, in both
directions, so a request/response round trip through the proxy costs 20 ms more than on plain
loopback (plus the proxy's own copying). Only latency is added, not a bandwidth cap: the proxy
keeps reading while earlier chunks wait for their delivery time, up to --buffer-mb per
direction (then it stops reading and TCP flow control pushes back on the sender).

Used by bench/daemon_bench.sh to put an S3 server (s3s-fs) "20 ms away" on loopback.
Stops on SIGTERM/SIGINT. Prints one line "listening HOST:PORT" once it accepts connections.
"""

import argparse
import asyncio
import signal
import socket
import sys

CHUNK = 256 * 1024


def hostport(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pipe(reader, writer, delay, limit_bytes):
    """Copies reader to writer, each chunk delivered `delay` seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    budget = asyncio.Semaphore(max(1, limit_bytes // CHUNK))

    async def pump_in():
        try:
            while True:
                await budget.acquire()
                data = await reader.read(CHUNK)
                queue.put_nowait((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time() + delay, b""))

    async def pump_out():
        try:
            while True:
                deadline, data = await queue.get()
                wait = deadline - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                budget.release()
        except (ConnectionError, OSError):
            return

    producer = asyncio.create_task(pump_in())
    try:
        await pump_out()
    finally:
        producer.cancel()


async def handle(client_reader, client_writer, target, delay, limit_bytes):
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError as error:
        print(f"delay_proxy: cannot connect to {target}: {error}", file=sys.stderr)
        client_writer.close()
        return
    nodelay(server_writer)
    await asyncio.gather(
        pipe(client_reader, server_writer, delay, limit_bytes),
        pipe(server_reader, client_writer, delay, limit_bytes),
        return_exceptions=True,
    )
    for writer in (client_writer, server_writer):
        try:
            writer.close()
        except OSError:
            pass


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay per direction")
    parser.add_argument("--buffer-mb", type=int, default=64, help="max bytes in transit per direction")
    args = parser.parse_args()
    delay = args.delay_ms / 1000.0
    target = hostport(args.target)
    limit = args.buffer_mb * 1024 * 1024

    async def on_client(reader, writer):
        nodelay(writer)
        await handle(reader, writer, target, delay, limit)

    host, port = hostport(args.listen)
    server = await asyncio.start_server(on_client, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
