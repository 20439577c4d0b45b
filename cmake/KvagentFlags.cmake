# Target-scoped compile flags (no global CMAKE_CXX_FLAGS edits).
add_library(kvagent_flags INTERFACE)
target_compile_options(kvagent_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror=return-type -Werror=unused-result -Wno-missing-field-initializers>)

if(KVAGENT_SANITIZE STREQUAL "address")
  set(_san -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
elseif(KVAGENT_SANITIZE STREQUAL "thread")
  set(_san -fsanitize=thread -fno-omit-frame-pointer)
elseif(KVAGENT_SANITIZE STREQUAL "undefined")
  set(_san -fsanitize=undefined -fno-sanitize-recover=undefined)
elseif(NOT KVAGENT_SANITIZE STREQUAL "")
  message(FATAL_ERROR "KVAGENT_SANITIZE must be address, thread, undefined or empty")
endif()
if(_san)
  # Sanitizers must cover every object linked together, so they propagate through the
  # INTERFACE target to the library, tests and benchmarks alike.
  target_compile_options(kvagent_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_san}>)
  target_link_options(kvagent_flags INTERFACE ${_san})
endif()

# KVAGENT_FUZZ: coverage instrumentation for libFuzzer on every object (the targets themselves
# link -fsanitize=fuzzer, tests/fuzz/CMakeLists.txt).
if(KVAGENT_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "KVAGENT_FUZZ needs clang (CMAKE_CXX_COMPILER=clang++)")
  endif()
  target_compile_options(kvagent_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=fuzzer-no-link>)
endif()
