// Kernel calls with their arguments packed in 64-bit slots, and a runner for a list of them: the native half
// of a recorded CPU decode step (engine/cpu_replay.py). Replaying ~300 kernel calls through ctypes costs ~3 us
// of argument conversion each and a GIL release and re-acquire; one ``run_program`` call costs one.
//
// A slot holds an integer (sign-extended), a pointer (its address) or a float (its bits in the low half).
// ``KI_PACKED(name)`` exports ``int name_packed(const uint64_t* slots)``, which unpacks the slots into
// ``name``'s parameter types (from its signature: nothing to keep in step by hand) and calls it.
// A program is the calls back to back, each ``[packed function, slot count, slots...]``.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace packed {

template <typename P>
inline P unpack(uint64_t slot) {
  if constexpr (std::is_pointer_v<P>) {
    return reinterpret_cast<P>(static_cast<uintptr_t>(slot));
  } else if constexpr (std::is_same_v<P, float>) {
    const auto bits = static_cast<uint32_t>(slot);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else {
    static_assert(std::is_integral_v<P>, "a packed kernel takes integers, pointers and floats");
    return static_cast<P>(static_cast<int64_t>(slot));
  }
}

template <typename... A, size_t... I>
inline int call(int (*fn)(A...), const uint64_t* slots, std::index_sequence<I...>) {
  return fn(unpack<A>(slots[I])...);
}

template <typename... A>
inline int call(int (*fn)(A...), const uint64_t* slots) {
  return call(fn, slots, std::index_sequence_for<A...>{});
}

using Packed = int (*)(const uint64_t* slots);

// Runs the program's calls in order; 0, or 1 + the index of the first call that returned nonzero (it stops).
inline int run_program(const uint64_t* program, int64_t length) {
  int index = 0;
  for (int64_t at = 0; at + 2 <= length; ++index) {
    const auto fn = reinterpret_cast<Packed>(static_cast<uintptr_t>(program[at]));
    if (fn(program + at + 2) != 0) return index + 1;
    at += 2 + static_cast<int64_t>(program[at + 1]);
  }
  return 0;
}

}  // namespace packed

#define KI_PACKED(name) \
  extern "C" int name##_packed(const uint64_t* slots) { return packed::call(name, slots); }
