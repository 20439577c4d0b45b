# llama.cpp engine (src/engines/llama_cpp -> target kvagent_llama).
#
# llama.cpp's own static libraries (llama + ggml CPU) are built from the sources vendored in the
# llama-cpp-python sdist by `make llama-cpp` (scripts/build_llama_cpp.sh) and installed under
# build-deps/llama.cpp-install; this file only finds that installation. KVAGENT_LLAMA_CPP:
#   AUTO (default) build the engine when the installation exists, else skip it
#   ON             require it      OFF  never build it
# Sets KVAGENT_HAVE_LLAMA_CPP.
set(KVAGENT_LLAMA_CPP "AUTO" CACHE STRING "Build the llama.cpp engine: ON, OFF or AUTO (when make llama-cpp has run)")
set_property(CACHE KVAGENT_LLAMA_CPP PROPERTY STRINGS AUTO ON OFF)
set(KVAGENT_LLAMA_CPP_PREFIX "${PROJECT_SOURCE_DIR}/build-deps/llama.cpp-install" CACHE PATH
    "Installation prefix of llama.cpp's static libraries")

set(KVAGENT_HAVE_LLAMA_CPP OFF)
if(NOT KVAGENT_LLAMA_CPP STREQUAL "OFF")
  find_package(llama CONFIG QUIET PATHS "${KVAGENT_LLAMA_CPP_PREFIX}" NO_DEFAULT_PATH)
  if(llama_FOUND)
    set(KVAGENT_HAVE_LLAMA_CPP ON)
  elseif(KVAGENT_LLAMA_CPP STREQUAL "ON")
    message(FATAL_ERROR "KVAGENT_LLAMA_CPP=ON but no llama.cpp under ${KVAGENT_LLAMA_CPP_PREFIX}; run `make llama-cpp`")
  endif()
endif()
message(STATUS "kv-agent: llama.cpp engine ${KVAGENT_HAVE_LLAMA_CPP} (KVAGENT_LLAMA_CPP=${KVAGENT_LLAMA_CPP})")

if(KVAGENT_HAVE_LLAMA_CPP)
  file(GLOB _kvagent_llama_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/engines/llama_cpp/*.cc)
  add_library(kvagent_llama STATIC ${_kvagent_llama_sources})
  add_library(kvagent::llama ALIAS kvagent_llama)
  set_target_properties(kvagent_llama PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_EXTENSIONS OFF)
  target_compile_features(kvagent_llama PUBLIC cxx_std_20)
  target_include_directories(kvagent_llama PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(kvagent_llama PUBLIC kvagent PRIVATE kvagent_flags kvagent_xxhash llama)
endif()
