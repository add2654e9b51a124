"""``kvsync serve``: discovery -> Reconciler -> EventManager -> Index ->
HTTP, in one process (SPEC 5).

Start-up: the index comes from the snapshot, else the peer, else empty;
registrations saved with the snapshot are followed again, the static pods
file is read, and index workers that nothing follows any more are dropped
(they could only answer with stale holdings). Shutdown (SIGTERM/SIGINT):
stop accepting, finish requests in flight (2 s at most), stop the event
manager, save the snapshot, return; well within the 10 s SPEC allows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from kvsync.service.app import HTTPError, make_app
from kvsync.service.config import Settings
from kvsync.service.metrics import Metrics
from kvsync.service.mooncake import Registry, register
from kvsync.service.snapshots import Snapshots
from kvsync.service.state import CachedStates, Service, WorkersView
from kvsync.transport import EventManager

__all__ = ["build_service", "serve"]

log = logging.getLogger("kvsync.service")

TICK = 0.5  # seconds between readiness/rate samples
KUBE_SYNC_WAIT = 10.0  # seconds start-up waits for the first Kubernetes pod list


def build_service(settings: Settings) -> Service:
    """Every part, wired; nothing started yet."""
    from kvsync.discovery import Reconciler, StaticSource
    from kvsync.routing import Router

    registry = Registry()
    snapshots = Snapshots(settings, registry)
    index = snapshots.load_initial()
    manager = EventManager(index, topic=settings.topic)
    metrics = Metrics()
    manager.on_live = metrics.observe_live
    reconciler = Reconciler(manager)
    workers_view = WorkersView(reconciler)

    router = Router(
        index,
        workers_view,
        states=CachedStates(manager),
        policy=settings.policy,
        tier_weights=settings.tier_weights,
        load_weight=settings.load_weight,
        load_ttl=settings.load_ttl,
        speculative_ttl=settings.speculative_ttl,
    )
    static = None
    if settings.pods is not None:
        static = StaticSource(settings.pods, reconciler)
        reconciler.expect("static")
    kube = None
    if settings.kubernetes is not None:
        from kvsync.discovery import KubernetesSource

        k = settings.kubernetes
        # Bad configuration raises KubernetesConfigError (a ValueError): exit 2.
        kube = KubernetesSource(
            reconciler,
            namespace=k.namespace,
            selector=k.selector,
            model_labels=k.model_labels,
            kubeconfig=k.kubeconfig,
        )
    service = Service(
        settings=settings,
        index=index,
        manager=manager,
        reconciler=reconciler,
        router=router,
        registry=registry,
        snapshots=snapshots,
        metrics=metrics,
        static=static,
        kube=kube,
        workers_view=workers_view,
    )
    metrics.bind(service)
    return service


def _follow(service: Service) -> None:
    """Start following: saved registrations, then the pods file; then drop
    index workers (from a snapshot) that nothing follows."""
    reg_path = service.snapshots.registrations_path
    if reg_path is not None:
        for req in service.registry.load(reg_path):
            try:
                register(service, req, None)
            except (HTTPError, ValueError) as e:
                log.warning("saved registration of %r not restored: %s", req.instance_id, e)
    if service.static is not None:
        service.static.load_once()
        service.static.start()
    if service.kube is not None:
        service.kube.start()
        # Pods loaded from a snapshot stay until the first list says which
        # are still there (bounded: an API outage must not block start-up).
        if not service.kube.wait_synced(KUBE_SYNC_WAIT):
            log.warning("kubernetes: no pod list within %.0f s; going on", KUBE_SYNC_WAIT)
            return  # drop nothing: an outage is not a deletion
    followed = set(service.reconciler.workers())
    for wid in service.index.workers():
        if wid not in followed:
            log.info("dropping %s from the loaded index: no longer followed", wid)
            with contextlib.suppress(Exception):
                service.index.remove_worker(wid)


async def _ticker(service: Service) -> None:
    while True:
        try:
            service.refresh()
            service.metrics.sample()
        except Exception:
            log.exception("periodic sampling failed")
        await asyncio.sleep(TICK)


async def serve(settings: Settings, on_listening: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT; then shut down in order and return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = await asyncio.to_thread(build_service, settings)
    service.manager.start()
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(_follow, service)
        runner = web.AppRunner(make_app(service), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        for addr in runner.addresses:
            host, port = addr[0], addr[1]
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            if on_listening is not None:
                on_listening(url)
            else:
                log.info("listening on %s", url)
        tasks = [
            asyncio.create_task(_ticker(service)),
            asyncio.create_task(service.snapshots.run_periodic()),
        ]
        await stop.wait()
        log.info("shutting down")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if runner is not None:
            await runner.cleanup()  # stop accepting, finish requests in flight
        if service.static is not None:
            await asyncio.to_thread(service.static.stop)
        if service.kube is not None:
            await asyncio.to_thread(service.kube.stop, 2.0)
        await asyncio.to_thread(service.manager.stop, 5.0)
        if service.snapshots.path is not None:
            try:
                path, size, seconds = await asyncio.to_thread(service.snapshots.save_sync)
                log.info("snapshot %s saved: %d bytes in %.2f s", path, size, seconds)
            except Exception:
                log.exception("final snapshot to %s failed", service.snapshots.path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(settings: Settings) -> int:
    def announce(url: str) -> None:
        print(f"kvsync serve: listening on {url}", file=sys.stderr, flush=True)

    from kvsync.discovery.kubernetes import KubernetesConfigError

    try:
        asyncio.run(serve(settings, announce))
    except KubernetesConfigError as e:
        print(f"kvsync serve: [kubernetes]: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"kvsync serve: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr
        )
        return 1
    return 0
