# Cross-compiling the C++ runtime for 64-bit Arm Linux (Jetson, Graviton, Raspberry Pi 4/5, phone
# SoCs running Linux) with Debian's cross toolchain and multiarch arm64 libraries:
#
#   apt-get install g++-aarch64-linux-gnu qemu-user      # cpp/scripts/install_deps.sh aarch64
#   dpkg --add-architecture arm64 && apt-get update && apt-get install libpng-dev:arm64 libjpeg62-turbo-dev:arm64
#   cmake -S cpp -B build/cpp-aarch64 -DCMAKE_TOOLCHAIN_FILE=cpp/cmake/aarch64-linux-gnu.cmake
#
# (`make cpp-aarch64` does all of it.) ctest runs the test programs under qemu-aarch64 through
# CMAKE_CROSSCOMPILING_EMULATOR; set TRANSMITER_AARCH64_SYSROOT if the target's C library is not
# in /usr/aarch64-linux-gnu (Debian's libc6-arm64-cross), or clear the emulator on a real arm64 host.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(TRANSMITER_AARCH64_TRIPLET aarch64-linux-gnu)

set(CMAKE_C_COMPILER ${TRANSMITER_AARCH64_TRIPLET}-gcc)
set(CMAKE_CXX_COMPILER ${TRANSMITER_AARCH64_TRIPLET}-g++)

# Debian multiarch: the arm64 -dev packages put their libraries in /usr/lib/aarch64-linux-gnu and
# share /usr/include with the host; this makes find_library look there and not in the x86 dirs.
set(CMAKE_LIBRARY_ARCHITECTURE ${TRANSMITER_AARCH64_TRIPLET})
set(CMAKE_FIND_ROOT_PATH /usr/${TRANSMITER_AARCH64_TRIPLET})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

if(DEFINED ENV{TRANSMITER_AARCH64_SYSROOT})
  set(TRANSMITER_AARCH64_SYSROOT "$ENV{TRANSMITER_AARCH64_SYSROOT}")
else()
  set(TRANSMITER_AARCH64_SYSROOT /usr/${TRANSMITER_AARCH64_TRIPLET})
endif()
find_program(TRANSMITER_QEMU_AARCH64 qemu-aarch64)
# The emulated CPU is a Neoverse N1 (Armv8.2: NEON and FP16 arithmetic, no SVE), as edge and cloud
# arm64 parts without SVE are (Jetson Orin's Cortex-A78AE, Graviton2), not qemu's default "max",
# whose SVE ONNX Runtime uses and qemu emulates about 11x slower (57 s against 5 s for 4 images of
# the demo bank). tests/cpp/cpp_builds.py emulates the same CPU (tests/test_suite_rules.py checks it).
set(TRANSMITER_QEMU_AARCH64_CPU neoverse-n1)
if(TRANSMITER_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${TRANSMITER_QEMU_AARCH64} -cpu ${TRANSMITER_QEMU_AARCH64_CPU}
      -L ${TRANSMITER_AARCH64_SYSROOT})
endif()
