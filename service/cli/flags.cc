#include "service/cli/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace qshard {

void FlagSet::AddString(const std::string& name, std::string* value, const std::string& help,
                        bool required) {
  Flag f{name, help, *value, required, false, false, nullptr};
  f.set = [value](const std::string& v) {
    *value = v;
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

void FlagSet::AddInt(const std::string& name, int64_t* value, const std::string& help,
                     bool required) {
  Flag f{name, help, absl::StrCat(*value), required, false, false, nullptr};
  f.set = [value, name](const std::string& v) {
    if (!absl::SimpleAtoi(v, value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": expected an integer, got '", v, "'"));
    }
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

void FlagSet::AddOptionalInt(const std::string& name, std::optional<int64_t>* value,
                             const std::string& help) {
  Flag f{name, help, "unset", false, false, false, nullptr};
  f.set = [value, name](const std::string& v) {
    int64_t x;
    if (!absl::SimpleAtoi(v, &x)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": expected an integer, got '", v, "'"));
    }
    *value = x;
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

void FlagSet::AddDouble(const std::string& name, double* value, const std::string& help) {
  Flag f{name, help, absl::StrFormat("%g", *value), false, false, false, nullptr};
  f.set = [value, name](const std::string& v) {
    double x;
    if (!absl::SimpleAtod(v, &x) || !std::isfinite(x)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": expected a number, got '", v, "'"));
    }
    *value = x;
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

void FlagSet::AddBool(const std::string& name, bool* value, const std::string& help) {
  Flag f{name, help, *value ? "true" : "false", false, true, false, nullptr};
  f.set = [value, name](const std::string& v) {
    std::string s = absl::AsciiStrToLower(v);
    if (s == "" || s == "true" || s == "1" || s == "yes") {
      *value = true;
    } else if (s == "false" || s == "0" || s == "no") {
      *value = false;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": expected true or false, got '", v, "'"));
    }
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

void FlagSet::AddBytes(const std::string& name, int64_t* value, const std::string& help) {
  Flag f{name, help, absl::StrCat(*value), false, false, false, nullptr};
  f.set = [value, name](const std::string& v) {
    absl::Status st = ParseByteSize(v, value);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", st.message()));
    return absl::OkStatus();
  };
  flags_.push_back(std::move(f));
}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (auto& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

absl::Status FlagSet::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(Usage().c_str(), stdout);
      return absl::CancelledError("help");
    }
    if (arg.rfind("--", 0) != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    bool negated = false;
    Flag* f = Find(name);
    if (f == nullptr && name.rfind("no-", 0) == 0) {
      f = Find(name.substr(3));
      negated = f != nullptr && f->is_bool;
      if (!negated) f = nullptr;
    }
    if (f == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag '--", name, "' for ", command_, " (see --help)"));
    }
    if (!value) {
      if (f->is_bool) {
        value = negated ? "false" : "true";
      } else {
        if (i + 1 >= argc) {
          return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
        }
        value = argv[++i];
      }
    }
    absl::Status st = f->set(*value);
    if (!st.ok()) return st;
    f->seen = true;
  }
  for (const auto& f : flags_) {
    if (f.required && !f.seen) {
      return absl::InvalidArgumentError(
          absl::StrCat("missing required flag --", f.name, " for ", command_, " (see --help)"));
    }
  }
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string out = absl::StrCat("usage: ", command_, " [flags]\n\n", description_, "\n\nflags:\n");
  for (const auto& f : flags_) {
    absl::StrAppend(&out, absl::StrFormat("  --%-28s %s", f.name + (f.is_bool ? "" : " V"), f.help));
    if (f.required) {
      absl::StrAppend(&out, " (required)");
    } else if (!f.default_text.empty()) {
      absl::StrAppend(&out, " (default: ", f.default_text, ")");
    }
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppend(&out, "  --help                         show this help\n");
  return out;
}

absl::Status ParseByteSize(const std::string& text, int64_t* out) {
  std::string s = absl::AsciiStrToUpper(text);
  double mult = 1;
  auto strip = [&](const std::string& suffix, double m) {
    if (s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0) {
      s.resize(s.size() - suffix.size());
      mult = m;
      return true;
    }
    return false;
  };
  strip("GIB", 1024.0 * 1024 * 1024) || strip("MIB", 1024.0 * 1024) || strip("KIB", 1024.0) ||
      strip("TIB", 1024.0 * 1024 * 1024 * 1024) || strip("TB", 1e12) || strip("GB", 1e9) ||
      strip("MB", 1e6) || strip("KB", 1e3) || strip("T", 1024.0 * 1024 * 1024 * 1024) ||
      strip("G", 1024.0 * 1024 * 1024) || strip("M", 1024.0 * 1024) || strip("K", 1024.0) ||
      strip("B", 1);
  double v;
  if (!absl::SimpleAtod(s, &v) || !std::isfinite(v) || v < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected a byte size like 536870912, 512M, 2G or 80GB, got '", text, "'"));
  }
  *out = static_cast<int64_t>(v * mult);
  return absl::OkStatus();
}

}  // namespace qshard
