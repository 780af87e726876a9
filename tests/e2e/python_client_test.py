"""An independent client: Debian's python3-grpcio with stubs generated from the .proto files
at test time (grpc_tools.protoc when installed, else protoc + grpc_python_plugin) streams
Generate and checks grpc.health.v1 for "" and "qshard.v1.Qshard".

usage: python_client_test.py QSHARD MODEL_DIR PROTO_DIR PROTOC GRPC_PYTHON_PLUGIN"""

import importlib
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qshard_e2e as e2e  # noqa: E402


def generate_stubs(proto_dir, protoc, plugin, out):
    # health.proto is compiled from a copy under another directory: generated from
    # grpc/health/v1/ its Python module would be grpc.health.v1, inside grpcio's own package.
    src = os.path.join(out, "protos")
    os.makedirs(os.path.join(src, "qshard", "v1"))
    os.makedirs(os.path.join(src, "health_v1"))
    shutil.copy(os.path.join(proto_dir, "qshard/v1/qshard.proto"), os.path.join(src, "qshard/v1"))
    shutil.copy(os.path.join(proto_dir, "grpc/health/v1/health.proto"),
                os.path.join(src, "health_v1"))
    try:
        importlib.import_module("grpc_tools.protoc")
        cmd = [sys.executable, "-m", "grpc_tools.protoc"]
    except ImportError:
        if not (os.path.exists(protoc) and os.path.exists(plugin)):
            print("SKIP: neither grpc_tools nor protoc + grpc_python_plugin available")
            sys.exit(e2e.SKIP)
        cmd = [protoc, "--plugin=protoc-gen-grpc_python=" + plugin]
    cmd += ["-I", src, "--python_out=" + out, "--grpc_python_out=" + out,
            "qshard/v1/qshard.proto", "health_v1/health.proto"]
    subprocess.run(cmd, check=True)
    # protoc writes no __init__.py; make the generated folders regular packages.
    for d in ["qshard", "qshard/v1", "health_v1"]:
        open(os.path.join(out, d, "__init__.py"), "a").close()


def main():
    qshard, model, proto_dir, protoc, plugin = sys.argv[1:6]
    try:
        import grpc  # noqa: F401
    except ImportError:
        print("SKIP: python3-grpcio is not installed for " + sys.executable)
        sys.exit(e2e.SKIP)
    import grpc
    out = e2e.temp_dir("qshard-pystubs-")
    generate_stubs(proto_dir, protoc, plugin, out)
    sys.path.insert(0, out)
    from qshard.v1 import qshard_pb2, qshard_pb2_grpc
    from health_v1 import health_pb2, health_pb2_grpc

    with e2e.Server(qshard, model) as server:
        channel = grpc.insecure_channel(server.address)
        grpc.channel_ready_future(channel).result(timeout=10)

        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "qshard.v1.Qshard"]:
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                e2e.fail("health %r: %s" % (service, resp.status))

        stub = qshard_pb2_grpc.QshardStub(channel)
        info = stub.GetModelInfo(qshard_pb2.GetModelInfoRequest(), timeout=5)
        if info.vocab_size != 4096 or info.architecture != "LlamaForCausalLM":
            e2e.fail("unexpected model info: %s" % info)

        req = qshard_pb2.GenerateRequest(
            request_id="py-1", text="In the beginning",
            sampling=qshard_pb2.SamplingParams(temperature=0.0, max_tokens=64))
        ids, text, chunks, complete = [], "", 0, None
        for resp in stub.Generate(req, timeout=30):
            if resp.request_id != "py-1":
                e2e.fail("request_id %r" % resp.request_id)
            if resp.HasField("chunk"):
                chunks += 1
                ids += list(resp.chunk.token_ids)
                text += resp.chunk.text
            elif resp.HasField("complete"):
                complete = resp.complete
        want = ("of his kingdom he was an hundred and thirty years, and he was born to him.")
        if text.strip() != want:
            e2e.fail("text %r" % text)
        if complete is None or complete.finish_reason != qshard_pb2.FINISH_REASON_STOP:
            e2e.fail("complete %s" % complete)
        if complete.usage.completion_tokens != len(ids) or chunks < 2:
            e2e.fail("usage %s with %d ids in %d chunks" % (complete.usage, len(ids), chunks))

        try:
            list(stub.Generate(qshard_pb2.GenerateRequest(
                text="x", sampling=qshard_pb2.SamplingParams(top_p=1.5)), timeout=5))
            e2e.fail("top_p=1.5 was accepted")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or "top_p" not in err.details():
                e2e.fail("top_p=1.5: %s %s" % (err.code(), err.details()))

        channel.close()
        code = server.stop()
        if code != 0:
            e2e.fail("exit code %d after SIGTERM:\n%s" % (code, server.stderr()))
    print("OK: python client")


if __name__ == "__main__":
    main()
