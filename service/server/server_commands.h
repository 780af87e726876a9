// File: server_commands.h
// Entry points of the `qshard` subcommands that need gRPC: serve, health, loadgen.
#ifndef QSHARD_SERVICE_SERVER_SERVER_COMMANDS_H_
#define QSHARD_SERVICE_SERVER_SERVER_COMMANDS_H_

namespace qshard {

// `qshard serve --model DIR ...`: serves until SIGTERM / SIGINT, then drains; exit 0.
int ServeMain(int argc, char** argv);
// `qshard health --addr HOST:PORT [--service NAME] [--timeout-ms N]`: exit 0 only when
// the server answers SERVING.
int HealthMain(int argc, char** argv);
// `qshard loadgen --addr HOST:PORT --concurrency C --requests N ...`: a bounded benchmark.
int LoadgenMain(int argc, char** argv);

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_SERVER_COMMANDS_H_
